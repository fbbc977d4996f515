"""PEFT methods, one folder each: config.py (dataclass) + layer modules [+ model.py]."""
