"""Same as `rlhub bench e2e [overrides]`: prints JSON."""

import json
import sys

from rlhub.benches.e2e import bench_e2e

if __name__ == "__main__":
    print(json.dumps(bench_e2e(sys.argv[1:]), indent=1))
