"""rlhub's Hydra configs, installed as the package `rlhub.conf` (`rlhub.config.CONF_DIR`)."""
