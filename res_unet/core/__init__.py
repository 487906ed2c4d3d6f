"""The ground floor: errors meant for users, atomic writes, output folders and their locks,
progress lines, the one channel for notes and warnings (messages) and res_unet's cache folder.

Imports nothing of res_unet's; every other package may import it.
"""
