"""Secrets stay out of what a run writes: its logs, `config.yaml`, and the config and metadata W&B keeps.

Sits at the edges where text leaves the run: the log handlers (`RedactFilter`),
the resolved config written to the run directory and given to W&B
(`redact_config`), and the command line W&B records (`redact_argv`).

A secret is
- the value of an environment variable whose name says it is one (a part of the
  name, split at `_`, is KEY, APIKEY, TOKEN, SECRET, PASSWORD, PASSWD or
  CREDENTIALS: WANDB_API_KEY, HF_TOKEN, OPENAI_API_KEY, AWS_SECRET_ACCESS_KEY),
  at least `MIN_LENGTH` characters long; wherever it appears in text, it is
  replaced by `REDACTED`. So is a token pasted on the command line or brought
  into the config by `${oc.env:...}`;
- a string config value under a key named like one (`api_key`, `access_key`,
  `hf_token`, `token`, `secret`, `password`, `credentials`, ...; `SECRET_KEY`).
  Names such as `pad_token` or `max_new_tokens` are not secrets.

A value redacted from `config.yaml` is not there for `rlhub eval RUN_DIR` to
read back: give it again on that command line (`key=${oc.env:NAME}`).

>>> import os; os.environ["DEMO_API_KEY"] = "s3cr3t-v4lue"
>>> redact_text("calling with s3cr3t-v4lue")
'calling with <redacted>'
>>> redact_config({"env": {"kwargs": {"api_key": "abc", "pad_token": "<pad>"}}, "experts_per_token": 2})
{'env': {'kwargs': {'api_key': '<redacted>', 'pad_token': '<pad>'}}, 'experts_per_token': 2}
>>> redact_argv(["train", "env.kwargs.api_key=abc", "run_dir=/tmp/s3cr3t-v4lue"])
['train', 'env.kwargs.api_key=<redacted>', 'run_dir=/tmp/<redacted>']
>>> del os.environ["DEMO_API_KEY"]
"""

from __future__ import annotations

import logging
import os
import re
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

REDACTED = "<redacted>"
MIN_LENGTH = 8
"""Shorter values of secret-named variables (a flag, a 0) are not searched for in text."""
SECRET_ENV_PARTS = frozenset({"KEY", "APIKEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIALS"})
SECRET_KEY = re.compile(
    r"^(?:.*_)?(?:api_?key|access_?key|secret_?key|private_?key|auth_?key|secret|password|passwd|credentials?)$"
    r"|^(?:.*_)?(?:api|auth|access|bearer|refresh|session|hf|github|gh|wandb)_?token$"
    r"|^token$"
)
"""Config key names whose string values are secrets (matched on the last part of the key, lower case)."""


def env_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of the secret-named environment variables, longest first (so that a secret containing
    another is replaced whole)."""
    environ = os.environ if environ is None else environ
    found = {v for k, v in environ.items() if SECRET_ENV_PARTS & set(k.upper().split("_")) and len(v) >= MIN_LENGTH}
    return sorted(found, key=len, reverse=True)


def is_secret_key(name: str) -> bool:
    """Whether a config key (its last dotted part) names a secret."""
    return bool(SECRET_KEY.match(name.rsplit(".", 1)[-1].lower()))


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    for secret in env_secrets() if secrets is None else secrets:
        text = text.replace(secret, REDACTED)
    return text


def redact_config(value: Any, secrets: list[str] | None = None, key: str = "") -> Any:
    """A copy of a plain config tree (dicts, lists, scalars) with the secrets replaced."""
    secrets = env_secrets() if secrets is None else secrets
    if isinstance(value, Mapping):
        return {k: redact_config(v, secrets, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_config(v, secrets) for v in value)
    if isinstance(value, str):
        return REDACTED if value and is_secret_key(key) else redact_text(value, secrets)
    return value


def redact_argv(argv: list[str], secrets: list[str] | None = None) -> list[str]:
    """A command line with the secrets replaced, a `key=value` override under a secret key included."""
    secrets = env_secrets() if secrets is None else secrets
    out = []
    for arg in argv:
        key, eq, _ = arg.partition("=")
        out.append(f"{key}={REDACTED}" if eq and is_secret_key(key.lstrip("+~")) else redact_text(arg, secrets))
    return out


@contextmanager
def redacted_argv() -> Iterator[None]:
    """`sys.argv` with its secrets replaced, for a library that records it (W&B keeps it as run metadata)."""
    kept = sys.argv
    sys.argv = [kept[0], *redact_argv(kept[1:])] if kept else kept
    try:
        yield
    finally:
        sys.argv = kept


class RedactFilter(logging.Filter):
    """On a log handler: the record's message (and traceback) with the secrets replaced."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = env_secrets()
        if not secrets:
            return True
        message = record.getMessage()
        clean = redact_text(message, secrets)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text, secrets)
        return True
