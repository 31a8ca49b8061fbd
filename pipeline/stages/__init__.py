"""Pipeline stages: each a block function plus a small driver; the science lives in ffn/, segclr/, storage/, viz/."""
