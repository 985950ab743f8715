"""``python -m dmdd.benchmark CELL_DIR``: run one cell in this process (the runner starts one per cell)."""

from dmdd.benchmark.cell import main

raise SystemExit(main())
