"""`python -m deepseek_operator.kubectl_plugin` runs the same as `kubectl-deepseek`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
