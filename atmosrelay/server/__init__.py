"""SMTP listeners and sessions: trio code that drives ``atmosrelay.smtp.ServerConnection``."""
