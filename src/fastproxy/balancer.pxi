# Balancing building blocks (upstream groups: choice, limits, passive health).
