"""Serving across engine instances: dispatch, rescheduling and live migration (Llumnix)."""
