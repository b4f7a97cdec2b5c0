import sys

from megatron_patch.launch.run import main

sys.exit(main())
