"""The review report: its markdown sections and figures."""
