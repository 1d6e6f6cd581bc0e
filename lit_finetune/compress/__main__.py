"""``python -m lit_finetune.compress`` = ``lit-finetune-export``."""

from lit_finetune.compress.cli import main

raise SystemExit(main())
