"""Reading usage: `GET /v1/analytics/...`, and the fold that keeps the roll-ups reads use.

`query` parses a request's parameters in the contract's order, `ranges` cuts a range into
the pieces each roll-up answers exactly, `totals` sums one organization's or user's usage,
`rollup` folds ingested deltas into the roll-ups, `routes` serves them over HTTP.
"""
