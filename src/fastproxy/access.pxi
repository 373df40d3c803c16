# Access control building blocks (IP rules, rate limits, PROXY protocol).
