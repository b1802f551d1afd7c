"""`python monai_deploy_app -i ... -o ...` and the MAP entry point."""

import sys

from app import main

if __name__ == "__main__":
    sys.exit(main())
