"""dmdd: Dual-Modeling Decouple Distillation for unsupervised anomaly detection (ACM MM 2024)."""

__version__ = "0.1.0"
