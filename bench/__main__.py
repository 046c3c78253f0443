"""`python -m bench` (what `make bench` runs after installing wrk): the intake benchmark, `bench.intake`.

Arguments are passed on: `python -m bench --duration 5 --apps ours`.
"""

import sys

from bench.intake import main

sys.exit(main())
