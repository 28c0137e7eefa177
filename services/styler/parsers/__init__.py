"""Tool-call and reasoning parsers per model family, and how "auto" picks them."""
