"""The usage dashboard at `/dashboard`: web pages for a person holding a key (contract 7)."""
