"""softprompt: train soft prompts (prompt tuning, prefix tuning, P-tuning) on frozen transformers."""

__version__ = "0.1.0"
