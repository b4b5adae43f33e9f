"""The site domain: a registry's rows and sources, their validation, counting, packing and
encryption, and what the site trusts. It imports ``core`` only; its rows never leave it."""
