"""Commands that are not stages of the chain: recreate, verify, publish."""
