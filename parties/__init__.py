"""Party-side code: data preparation, protocols and their roles."""
