"""Reproduce the paper tables (``make reproduce-table1`` / ``reproduce-table2``): table specs in configs/reproduce/,
published numbers (`published`), the runner (`runner`) and the table writer (`tables`)."""
