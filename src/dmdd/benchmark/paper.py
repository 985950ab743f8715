"""The paper's published DMDD rows (Liu et al., ACM MM 2024, Tables 1-3), in %, shown beside ours in the tables of
suites whose dataset names ``paper:``. Keys are the datasets' category folder names. ``None``: not published."""

from __future__ import annotations

# category -> (I-AUROC, P-AUROC, AU-PRO)
MVTEC = {
    "carpet": (99.96, 99.26, 98.11), "grid": (100.0, 99.46, 97.57), "leather": (100.0, 99.76, 99.50),
    "tile": (100.0, 99.53, 97.43), "wood": (99.74, 98.02, 96.37), "bottle": (100.0, 98.99, 97.07),
    "cable": (98.43, 97.97, 92.10), "capsule": (99.60, 99.01, 97.06), "hazelnut": (99.93, 99.28, 96.92),
    "metal_nut": (99.90, 98.40, 95.25), "pill": (98.15, 99.33, 97.77), "screw": (96.19, 99.32, 97.32),
    "toothbrush": (100.0, 99.41, 95.81), "transistor": (99.17, 95.63, 85.87), "zipper": (99.87, 99.41, 97.77),
}  # fmt: skip
BTAD = {"01": (None, 96.95, 79.92), "02": (None, 97.33, 74.25), "03": (None, 99.89, 86.67)}
MPDD = {
    "bracket_black": (95.74, 98.57, 97.18), "bracket_brown": (98.94, 97.31, 96.11),
    "bracket_white": (98.33, 99.66, 99.29), "connector": (100.0, 99.68, 98.28), "metal_plate": (100.0, 99.08, 96.51),
    "tubes": (95.56, 99.44, 98.58),
}  # fmt: skip
TABLES = {"mvtec": MVTEC, "btad": BTAD, "mpdd": MPDD}
# the paper's reported means (its own rounding): I-AUROC, P-AUROC, AU-PRO
MEANS = {"mvtec": (99.40, 98.85, 96.13), "btad": (None, 98.06, 80.28), "mpdd": (98.10, 98.96, 97.66)}


def paper_row(table: str, category: str) -> tuple[float | None, float | None, float | None] | None:
    return TABLES.get(table, {}).get(category)
