"""`make bench`: figures of the loop, each written as JSON under bench/results/."""
