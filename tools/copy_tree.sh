# Sourced by tools/sanitize.sh and tools/clang_test.sh (run from the repository root):
#   copy_tree WORK   mirrors the checkout's tracked and untracked, not ignored, files
#                    into WORK/src. Files that left the tree since the last copy leave
#                    the copy too; tar keeps mtimes, so setup.py then rebuilds only the
#                    extensions whose sources changed. WORK/files lists the last copy.
copy_tree() {
    local work="$1" src="$1/src"
    mkdir -p "$src"
    git ls-files -z --cached --others --exclude-standard > "$work/files.new"
    if [ -f "$work/files" ]; then
        comm -z -23 <(sort -z "$work/files") <(sort -z "$work/files.new") | (cd "$src" && xargs -0 -r rm -f --)
    fi
    tar --null -T "$work/files.new" --ignore-failed-read -cf - 2> /dev/null | tar -xf - -C "$src"
    mv "$work/files.new" "$work/files"
}
