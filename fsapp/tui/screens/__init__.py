"""The screens, one module each. A screen receives its data when it is made (and through messages
from the app) and posts messages up (fsapp.tui.messages); none imports the app."""
