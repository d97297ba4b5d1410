"""Overhead benchmarks (`securecollab bench ...`): each protocol against its plain counterpart, written as JSON."""
