"""Reading runs back and showing them: run records, plots, the study harness and its report,
per-token compute maps. Sits above training/ and hf/ (imports them, never the reverse)."""
