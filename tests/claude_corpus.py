"""A varied corpus for measuring token estimates: prose, code, data, scripts, symbols."""

CORPUS = {
    "english_prose": (
        "The committee met on Tuesday to review the quarterly budget. After a long discussion about "
        "travel expenses, the members agreed to postpone any decision until the auditors had finished "
        "their report. Several people pointed out that the figures for the northern office looked "
        "unusually high, and asked for a breakdown by month before the next meeting."),
    "english_dialogue": (
        "\"Are you coming tonight?\" she asked.\n\"I can't, I've got to finish this report,\" he said. "
        "\"Maybe tomorrow? We could grab lunch instead — there's that new place on Fifth Street.\""),
    "python_code": (
        "def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:\n"
        "    \"\"\"Merge overlapping intervals, sorted by start.\"\"\"\n"
        "    out: list[tuple[int, int]] = []\n"
        "    for start, end in sorted(intervals):\n"
        "        if out and start <= out[-1][1]:\n"
        "            out[-1] = (out[-1][0], max(out[-1][1], end))\n"
        "        else:\n"
        "            out.append((start, end))\n"
        "    return out\n"),
    "javascript_code": (
        "export async function fetchAll(urls, { retries = 3 } = {}) {\n"
        "  const results = await Promise.allSettled(urls.map((u) => fetchWithRetry(u, retries)));\n"
        "  return results.filter((r) => r.status === 'fulfilled').map((r) => r.value);\n"
        "}\n"),
    "json": (
        '{"order_id": "A-10293", "customer": {"name": "Dana Ruiz", "email": "dana@example.com"}, '
        '"items": [{"sku": "KB-77", "qty": 2, "price": 49.99}, {"sku": "MS-12", "qty": 1, '
        '"price": 19.5}], "shipping": {"method": "express", "eta_days": 2}, "paid": true}'),
    "numbers": (
        "2024-03-15 09:41:27 1837.25 -0.000412 3.14159265358979 6.022e23 4,294,967,295 "
        "192.168.10.254 +1 (415) 555-0132 0x7fffffff 1010110011 99.9% 12/31/1999"),
    "chinese": "人工智能正在改变我们的工作方式。许多公司开始使用大型语言模型来处理客户服务、编写代码和分析数据，但成本控制仍然是一个重要的问题。",
    "japanese": "来週の会議は火曜日の午後三時から始まります。資料は前日までに共有フォルダにアップロードしてください。よろしくお願いいたします。",
    "korean": "오늘 날씨가 정말 좋네요. 점심 먹고 공원에 산책하러 갈까요? 저녁에는 비가 온다고 하니 우산을 챙기세요.",
    "russian": "Пожалуйста, отправьте мне отчёт до конца недели. Если возникнут вопросы, звоните в любое время.",
    "arabic": "نحن سعداء بالإعلان عن إطلاق المنتج الجديد في الأسواق العربية خلال الربع القادم من هذا العام.",
    "emoji_and_symbols": "Launch day! 🚀🎉 Thanks team 🙏 — stats: ✅ 42 passed, ❌ 3 failed, ⚠️ 7 warnings → ship? 🤔",
    "markdown": (
        "# Release notes\n\n## Fixed\n- **Auth:** tokens now expire after `3600` s.\n- Fixed a crash in "
        "[`parse()`](https://example.com/docs#parse) when input is empty.\n\n| col | value |\n|---|---|\n| a | 1 |\n"),
    "url_and_paths": (
        "https://api.example.com/v2/users/8812/orders?status=open&sort=-created_at&page=3 "
        "/usr/local/lib/python3.11/site-packages/aiohttp/web_protocol.py C:\\Users\\dana\\Documents\\q3.xlsx"),
    "whitespace_heavy": "col1\t\tcol2\t\tcol3\n    indented    line    \n\n\n        deeper\n" * 3,
    "repeated_letters": "a" * 200 + " " + "ha" * 50,
}
