"""Attacks on transcripts: what each party can still learn from exactly what it received."""
