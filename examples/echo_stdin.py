"""Echo standard input, upper-cased.

Usage: nanogrid run examples/echo_stdin.py --runtime python --stdin some_file.txt
"""

import sys

for line in sys.stdin:
    sys.stdout.write(line.upper())
