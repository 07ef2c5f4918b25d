"""Tests that run the launchers, the server, the synthesis command or several processes (marked slow where they do)."""
