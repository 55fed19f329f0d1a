"""`python -m tokenpool.prefill_svc`: run a prefill instance (flags: --help)."""

import sys

from tokenpool.cli.instance_process import main

sys.exit(main("prefill"))
