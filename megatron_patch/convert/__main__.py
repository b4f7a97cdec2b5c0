import sys

from megatron_patch.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
