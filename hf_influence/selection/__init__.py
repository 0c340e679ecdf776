"""Selection: from scores to rows (the rules, in memory and streamed), the landmark regression that spreads landmark scores to the pool, and the robust weights."""
