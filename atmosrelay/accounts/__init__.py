"""Members, their handles and sending domains, API keys, DKIM keys, suppressions.

``store`` (SQLite), ``identity`` (DIDs, handles, resolution), ``domains`` (enrollment and DNS
proof), ``dkim_keys`` (key pairs and records), ``api_keys`` (issue, verify, brute force).
"""
