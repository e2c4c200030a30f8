"""`python -m llama_hybrid.cli` == `llama-hybrid`."""

from .main import main

raise SystemExit(main())
