"""`python -m synthgap_helpers ...`"""

import sys

try:
    from synthgap_helpers.cli import main
except KeyboardInterrupt:  # Ctrl-C while the libraries load: nothing was written yet
    from synthgap_helpers.errors import INTERRUPTED

    print(INTERRUPTED, file=sys.stderr)
    sys.exit(130)  # 128 + SIGINT, as cli.EXIT_INTERRUPTED

sys.exit(main())
