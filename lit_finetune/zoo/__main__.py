"""``python -m lit_finetune.zoo``: the same as ``lit-finetune-zoo``."""

import sys

from lit_finetune.zoo import main

sys.exit(main())
