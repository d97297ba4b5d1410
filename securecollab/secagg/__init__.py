"""Secure aggregation's cryptography: fixed-point additive sharing, CrypTen MPC on the shares, CrypTen compatibility."""
