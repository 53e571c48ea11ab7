"""Steps, names, rotation, the commit protocol and the async writer. No Lightning."""
