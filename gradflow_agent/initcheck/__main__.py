"""`python -m gradflow_agent.initcheck ...` is `gradflow-agent init-check ...`."""

from .cli import main

raise SystemExit(main())
