"""Messages: header processing at acceptance (``headers``); DKIM signing and DSNs come with
delivery."""
