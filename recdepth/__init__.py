"""recdepth: pretrain depth-recurrent language models (Huginn / recurrent depth)."""

__version__ = "0.1.0"
