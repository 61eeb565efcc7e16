"""Who may call what: principals, roles, tokens, TLS identities and rate limits."""
