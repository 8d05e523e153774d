"""ctkd: Curriculum Temperature for Knowledge Distillation (Li et al., AAAI 2023) as a research framework."""

__version__ = "0.1.0"
