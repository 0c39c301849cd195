"""Results to JSON dicts, rich tables, Markdown and PNG. No math, no file reading."""
