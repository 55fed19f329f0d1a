"""`python -m tokenpool.decode_svc`: run a decode instance (flags: --help)."""

import sys

from tokenpool.cli.instance_process import main

sys.exit(main("decode"))
