"""Small helpers shared by every stage: model modes and RNG isolation."""
