"""`python -m synthgap_helpers ...`"""

import sys

from synthgap_helpers.cli import main

sys.exit(main())
