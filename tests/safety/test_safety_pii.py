"""PII and secrets detection, measured on labelled cases: per type, sentences that hold one value
(which must be found, span exact) and look-alikes that must not fire (an order number failing
Luhn, a version string shaped like an IP, a retina image name shaped like an e-mail).
The precision/recall table is printed (pytest -s, or -rA) and floors are asserted per type."""

import pytest

from llmasos.safety import default_guards

from labelled import assert_floors

SLACK = "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
NPM = "npm_abcdefghijklmnopqrstuvwxyz0123456789"
PRIVATE_KEYS = [
    f"-----BEGIN {kind}PRIVATE KEY{block}-----\n{body}\n-----END {kind}PRIVATE KEY{block}-----"
    for kind, block, body in [
        ("RSA ", "", "MIIEpAIBAAKCAQEA\nq2Hc7xYz"),
        ("EC ", "", "MHcCAQEE"),
        ("OPENSSH ", "", "b3BlbnNzaC1rZXk"),
        ("PGP ", " BLOCK", "lQOYBF"),
        ("", "", "MIIEvQIBADANBg"),
        ("ENCRYPTED ", "", "MIIFHzBJ"),
    ]
]
CUT_KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA"  # generation stopped inside the key
# category -> (positives: (text, the value that must be found), negatives: texts where it must not fire)
CASES: dict[str, tuple[list[tuple[str, str]], list[str]]] = {
    "email": (
        [
            ("Write to john.doe@example.com for details.", "john.doe@example.com"),
            ("cc: a_b+tag@mail.co.uk, thanks", "a_b+tag@mail.co.uk"),
            ("Contact <first.last@sub.domain.org>.", "first.last@sub.domain.org"),
            ("x@y.io", "x@y.io"),
            ("Jane-Doe99@Example.COM wrote:", "Jane-Doe99@Example.COM"),
            ("support@company-name.net is open 24/7", "support@company-name.net"),
            ("email:alice@wonder.land;", "alice@wonder.land"),
            ("(bob.smith@university.edu)", "bob.smith@university.edu"),
            ("Mail 12345@numbers.biz now.", "12345@numbers.biz"),
            ("Reach me at ops%team@corp.example.", "ops%team@corp.example"),
        ],
        [
            "ssh into user@localhost first",
            "follow @handle on social media",
            "john at example dot com",
            "foo@bar is not an address",
            "see name@.com and a@b.c",
            "email@domain..com",
            "use the icon@2x.png asset",
            "the decorator @property",
            "price is 5@3.50 each",
        ],
    ),
    "phone": (
        [
            ("Call +1 (650) 253-0000 today.", "+1 (650) 253-0000"),
            ("Office: (212) 736-5000", "(212) 736-5000"),
            ("dial 650.253.0000 now", "650.253.0000"),
            ("My number is 415-555-0132.", "415-555-0132"),
            ("London +44 20 7946 0958", "+44 20 7946 0958"),
            ("UK line 020 7946 0958.", "020 7946 0958"),
            ("Berlin +49 30 901820", "+49 30 901820"),
            ("Paris: +33 1 42 68 53 00", "+33 1 42 68 53 00"),
            ("India +91 98765 43210", "+91 98765 43210"),
            ("toll free 1-800-555-0199", "1-800-555-0199"),
            ("desk 650 253 0000 ext. 12 ok", "650 253 0000 ext. 12"),
            ("Call 415-555-0132 22 times", "415-555-0132"),
        ],
        [
            "Order 123-456-7890 shipped",
            "released on 2024-01-15",
            "ISBN 978-3-16-148410-0",
            "order 10023 and 12345678",
            "zip 90210-1234",
            "price 1,234,567",
            "pi is 3.14159265",
            "card 4111 1111 1111 1111",
            "SSN 536-22-1234",
            "server 192.168.1.20",
        ],
    ),
    "credit_card": (
        [
            ("Visa 4111 1111 1111 1111 exp 12/25", "4111 1111 1111 1111"),
            ("card 4012888888881881.", "4012888888881881"),
            ("MC 5555-5555-5555-4444", "5555-5555-5555-4444"),
            ("use 5105 1051 0510 5100", "5105 1051 0510 5100"),
            ("Amex 3782 822463 10005", "3782 822463 10005"),
            ("amex 371449635398431", "371449635398431"),
            ("Discover 6011 1111 1111 1117", "6011 1111 1111 1117"),
            ("JCB 3530111333300000", "3530111333300000"),
            ("Diners 3056 9309 0259 04", "3056 9309 0259 04"),
            ("MC 2223 0031 2200 3222", "2223 0031 2200 3222"),
            ("old visa 4222222222222", "4222222222222"),
            ("paid with 4111 1111 1111 1111 12/25", "4111 1111 1111 1111"),
        ],
        [
            "Order 4111 1111 1111 1112 shipped",
            "ref 1234 5678 1234 5678",
            "tracking 5500000000000005",
            "invoice 6011-1234-1234-1234",
            "ISBN 978-0-306-40615-7",
            "timestamp 20240115093000",
            "phone +1 650 253 0000",
            "account 12345678901234567890123",
        ],
    ),
    "iban": (
        [
            ("IBAN DE89 3704 0044 0532 0130 00 please", "DE89 3704 0044 0532 0130 00"),
            ("pay GB82 WEST 1234 5698 7654 32.", "GB82 WEST 1234 5698 7654 32"),
            ("FR14 2004 1010 0505 0001 3M02 606", "FR14 2004 1010 0505 0001 3M02 606"),
            ("to NL91ABNA0417164300 today", "NL91ABNA0417164300"),
            ("ES9121000418450200051332", "ES9121000418450200051332"),
            ("IT60X0542811101000000123456 (Italy)", "IT60X0542811101000000123456"),
            ("Swiss CH93 0076 2011 6238 5295 7", "CH93 0076 2011 6238 5295 7"),
            ("AT611904300234573201", "AT611904300234573201"),
            ("PL61 1090 1014 0000 0712 1981 2874", "PL61 1090 1014 0000 0712 1981 2874"),
            ("BE71 0961 2345 6769 BIC GEBABEBB", "BE71 0961 2345 6769"),
        ],
        [
            "IBAN DE89 3704 0044 0532 0130 01",
            "GB82 WEST 1234 5698 7654 33",
            "XX12 3456 7890 1234 56",
            "SKU DE12 ABCD 1234 5678",
            "NL91ABNA041716430",
            "model AB12CD34 and US12 3456 7890 1234",
        ],
    ),
    "us_ssn": (
        [
            ("SSN 536-22-1234.", "536-22-1234"),
            ("ssn: 412 55 7890", "412 55 7890"),
            ("(078-05-1121)", "078-05-1121"),
            ("id 001-01-0001 on file", "001-01-0001"),
            ("772-10-4321", "772-10-4321"),
            ("number 529-34-8812, ok", "529-34-8812"),
            ("345-67-8910 is mine", "345-67-8910"),
            ("SSN 611-20-3333", "611-20-3333"),
        ],
        [
            "666-12-3456",
            "000-12-3456",
            "912-34-5678",
            "123-00-4567",
            "123-45-0000",
            "078-05-1120",
            "123-45-67890",
            "call 555-123-4567",
            "536-22 1234",
        ],
    ),
    "uk_nino": (
        [
            ("NI number AB 12 34 56 C.", "AB 12 34 56 C"),
            ("AB123456C", "AB123456C"),
            ("nino CE 10 20 30 A", "CE 10 20 30 A"),
            ("JG 10 37 72 B on file", "JG 10 37 72 B"),
            ("(NH 99 88 77 D)", "NH 99 88 77 D"),
            ("PR123456A", "PR123456A"),
            ("WL 76 54 32 B", "WL 76 54 32 B"),
            ("ZY 11 22 33 C", "ZY 11 22 33 C"),
        ],
        [
            "QQ 12 34 56 C",
            "DA 12 34 56 A",
            "BG 12 34 56 A",
            "GB123456A",
            "AB 12 34 56 E",
            "AO 12 34 56 A",
            "AB 12 34 56",
            "NK 12 34 56 B",
            "part AB12345C",
        ],
    ),
    "ip_address": (
        [
            ("server 192.168.1.20 is down", "192.168.1.20"),
            ("ping 10.0.0.1.", "10.0.0.1"),
            ("DNS 8.8.8.8", "8.8.8.8"),
            ("host=172.16.254.3", "172.16.254.3"),
            ("from 203.0.113.45:8080", "203.0.113.45"),
            ("v6 2001:db8::8a2e:370:7334 here", "2001:db8::8a2e:370:7334"),
            ("link fe80::1ff:fe23:4567:890a", "fe80::1ff:fe23:4567:890a"),
            ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
        ],
        [
            "upgrade to version 1.2.3.4 now",
            "tag v1.2.3.4",
            "release 10.0.0.1 notes",
            "Build 4.18.0.305",
            "sequence 1.2.3.4.5",
            "bad 256.1.1.1 and 999.10.10.10",
            "at 12:30:45 sharp",
            "slice x[1::2]",
            "std::vector<int>",
            "MAC 00:1A:2B:3C:4D:5E",
            "Python 3.11.7",
        ],
    ),
    "street_address": (
        [
            ("I live at 1600 Pennsylvania Avenue NW, Washington.", "1600 Pennsylvania Avenue NW"),
            ("221B Baker Street, London", "221B Baker Street"),
            ("Visit 350 Fifth Avenue today", "350 Fifth Avenue"),
            ("No. 10 Downing Street", "10 Downing Street"),
            ("742 Evergreen Terrace", "742 Evergreen Terrace"),
            ("ship to 123 Main St. Apt 4B please", "123 Main St. Apt 4B"),
            ("2 W 34th St", "2 W 34th St"),
            ("500 S Buena Vista St, Burbank", "500 S Buena Vista St"),
            ("1 Microsoft Way, Redmond", "1 Microsoft Way"),
            ("77 Massachusetts Ave", "77 Massachusetts Ave"),
        ],
        [
            "Route 66 was a highway",
            "the shop is 3 streets away",
            "the 5th Avenue store",
            "In 2019 we moved",
            "Chapter 12 Main Points",
            "version 2 Drive",
            "We sold 500 units on Main Street",
            "about 3 Square Miles",
            "Top 10 Reasons",
        ],
    ),
    "api_key": (
        [
            ("aws key AKIAIOSFODNN7EXAMPLE ok", "AKIAIOSFODNN7EXAMPLE"),
            ("token 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", "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"),
            ("glpat-xYz12AbCdEfGhIjKlMnO3 is the token", "glpat-xYz12AbCdEfGhIjKlMnO3"),
            (f"slack {SLACK}", SLACK),
            ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
            (
                "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",
                "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",
            ),
            ("twilio SK0123456789abcdef0123456789abcdef", "SK0123456789abcdef0123456789abcdef"),
            (f"jwt {JWT} in a header", JWT),
            (f"//registry.npmjs.org/:_authToken={NPM}", NPM),
            ("stripe test sk_test_4eC39HqLyjWDarjtT1zdp7dc", "sk_test_4eC39HqLyjWDarjtT1zdp7dc"),
        ],
        [
            "ghp_short and sk_test_... and sk-...",
            "id '123e4567-e89b-12d3-a456-426614174000'",
            "the AKIA prefix",
            "say 'hello world' and 'abcdefghijklmnopqrstuvwxyz'",
            "value '${API_KEY}'",
            "commit 3f2a9b1c0d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a",
            "path '/usr/local/bin/python3'",
        ],
    ),
    "secret": (
        [
            ('password = "hunter2xyz"', "hunter2xyz"),
            ('api_key: "s3cr3tValue"', "s3cr3tValue"),
            ("db_pass == 'Tr0ub4dor3'", "Tr0ub4dor3"),
            ('secret => "abc123def"', "abc123def"),
            ("postgres://admin:Sup3rS3cret@db.example.com/app", "Sup3rS3cret"),
            ('config = {"token": "x7Gq9LmP2vRt8KwZ3nYb5HcJ4dF6sA1e"}', "x7Gq9LmP2vRt8KwZ3nYb5HcJ4dF6sA1e"),
            ('private_key "xyz987abc";', "xyz987abc"),
        ],
        [
            'password = "${DB_PASSWORD}"',
            'password = "$PASS"',
            'password = ""',
            "Enter your password below",
            "secret = get_secret()",
            "the password is strong",
            'password = "********"',
        ],
    ),
    "private_key": (
        [
            *((f"key:\n{block}\nbye", block) for block in PRIVATE_KEYS),
            (f"cut off: {CUT_KEY}", CUT_KEY),
        ],
        [
            "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0B\n-----END PUBLIC KEY-----",
            "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIE\n-----END CERTIFICATE-----",
            "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 user@host",
            "the private key must be kept secret",
        ],
    ),
}
# Floors per type; the table printed by the test shows the measured values.
MIN_PRECISION = 0.95
MIN_RECALL = 0.9


@pytest.fixture(scope="module")
def guards():
    return default_guards()


def _found(guards, text: str, category: str) -> list[str]:
    return [text[f.start : f.end] for g in guards for f in g.check(text) if f.category == category]


def test_every_category_has_labelled_cases():
    from llmasos.safety import pii_guard, secrets_guard

    assert set(CASES) == {c for guard in (pii_guard(), secrets_guard()) for c in guard.categories}
    for category, (positives, negatives) in CASES.items():
        assert len(positives) >= 6 and len(negatives) >= 4, category


def test_precision_and_recall_per_type(guards):
    rows, failures = [], []
    for category, (positives, negatives) in CASES.items():
        tp = fp = fn = 0
        for text, value in positives:
            found = _found(guards, text, category)
            hit = value in found
            tp, fn = tp + hit, fn + (not hit)
            fp += len([f for f in found if f != value])
            if not hit:
                failures.append(f"missed {category}: {value!r} in {text!r} (found {found})")
        for text in negatives:
            found = _found(guards, text, category)
            fp += len(found)
            failures += [f"false {category}: {f!r} in {text!r}" for f in found]
        precision = tp / (tp + fp) if tp + fp else 1.0
        recall = tp / (tp + fn)
        rows.append((category, len(positives), len(negatives), precision, recall))
    assert_floors(rows, failures, MIN_PRECISION, MIN_RECALL, "type")


def test_findings_carry_guard_score_and_exact_span(guards):
    text = "mail john.doe@example.com, key AKIAIOSFODNN7EXAMPLE"
    findings = sorted((f for g in guards for f in g.check(text)), key=lambda f: f.start)
    assert [(f.category, f.guard, text[f.start : f.end]) for f in findings] == [
        ("email", "pii", "john.doe@example.com"),
        ("api_key", "secrets", "AKIAIOSFODNN7EXAMPLE"),
    ]
    assert all(0.0 < f.score <= 1.0 for f in findings)


def test_lines_are_scanned_apart_and_offsets_stay_global(guards):
    """A value on a later line is found at its offset in the whole text; a phone number split
    by a newline is two lines, and neither half is a number."""
    text = "first line\nsecond: bob@example.org\n650-253-\n0000"
    emails = [f for g in guards for f in g.check(text) if f.category == "email"]
    assert [text[f.start : f.end] for f in emails] == ["bob@example.org"]
    assert _found(guards, text, "phone") == []
