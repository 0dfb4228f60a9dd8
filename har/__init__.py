"""Hardness Aware Reweighting (HAR, Duggal et al., IEEE BigData 2021) for long-tailed image classification."""

__version__ = "0.1.0"
